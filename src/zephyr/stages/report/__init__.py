"""`zephyr report RUN` (`run`): report.json, report.md and one self-contained report.html of a run folder."""
