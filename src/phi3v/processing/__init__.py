"""Text and images into model inputs: tokenizer and chat template, image processing, image-tag prompts."""
