"""The networks, one folder each: configuration, building blocks and the assembled network."""
