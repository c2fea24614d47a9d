"""One-off studies behind a decision (issue 4's retrieval gain); kept to reproduce them."""
