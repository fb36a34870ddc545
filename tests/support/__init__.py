"""Helpers shared by the tests (not tests themselves): spool rigs and fault
injection, capture sources, an agent served on loopback."""
