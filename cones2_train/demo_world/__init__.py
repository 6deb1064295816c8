"""A procedurally generated world of coloured shapes, and the recipe that trains the demo model on it."""
