"""Training: state, pure steps, parallel builders, the fit loop."""
