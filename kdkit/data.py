"""Data loading and the paper's labeled / unlabeled / tune split (being implemented)."""
