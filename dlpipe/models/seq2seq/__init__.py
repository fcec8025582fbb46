"""seq2seq: registered by its family module until the split commit."""
