"""Model code behind the built-in architecture plugins (imported lazily, on first use)."""
