"""Trained draft heads: the nn.Modules (block, EAGLE, DSpark) and their training-side math.

Which class a family uses is the family's own declaration (`drafters/families/`)."""
