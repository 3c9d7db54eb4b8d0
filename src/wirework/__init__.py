"""wirework."""
