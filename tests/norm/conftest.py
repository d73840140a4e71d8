from norm_models import dtype  # noqa: F401  (fixture)
