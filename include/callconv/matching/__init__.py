"""Stage 4: match each sale to its call in the warehouse, and queue conversions for delivery."""
