"""Model cards of the checkpoints trained with training/ and their generator (`generate_card.py`)."""
