"""kopf wiring of the WeightSync operator."""
