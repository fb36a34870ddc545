"""Helpers shared by the tests (not tests themselves): spool rigs and fault
injection, capture sources, an agent served on loopback, the fleet's store and
its device and operator settings."""
