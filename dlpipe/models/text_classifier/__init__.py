"""text_classifier: registered by its family module until the split commit."""
