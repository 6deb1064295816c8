"""`cones2_train`: learn a subject's residual from a few images (SPEC section 1)."""
