"""`disagg` proto package (generated code under protos/disagg/v1)."""
