"""Neural networks, scikit-learn pipelines, features and the model zoo."""
