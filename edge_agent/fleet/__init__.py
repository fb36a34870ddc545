"""Fleet operations through the bucket: devices that accept no inbound
connection answer retrieval requests and leave their health in the object
store they upload to, and the operator's ``edge-agent fleet`` command reads
and writes the same objects (`records` is their layout, shared by both sides).
"""
