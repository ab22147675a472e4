"""Training and evaluation primitives, shared by the stages and bench/; they import nothing above model/."""
