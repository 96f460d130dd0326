"""Figures (``figures``: spatial maps, score plots) and ``report.html`` (``report``)."""
