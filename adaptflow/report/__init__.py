"""What people read: the run summary, its text tables, the run page, the history page, and the MLflow mirror."""
