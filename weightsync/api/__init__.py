"""The WeightSync custom resource: pydantic models that are the CRD's single source of truth."""
