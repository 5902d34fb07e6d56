"""`cfjax serve`: the counterfactual explorer in the browser (FastAPI; see `app`)."""
