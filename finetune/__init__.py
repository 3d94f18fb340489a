"""Downstream fine-tuning of any Hugging Face encoder folder, and the comparison report."""
