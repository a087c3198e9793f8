"""The reward server (`spatialscore serve`: server.py, protocol.py, batching.py) and its client (client.py,
`RemoteReward`, what trainers use when `reward.remote` is set)."""
