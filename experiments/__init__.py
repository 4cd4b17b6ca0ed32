"""absl-flag drivers for fedprune experiments. Flags live only here."""
