"""Runner processes: one per shard of an instance, spawned and supervised by the node's worker.

`python -m shoal.runner` (see __main__.py) joins the instance's `torch.distributed` group, loads its shard,
warms up and serves tasks in lockstep with the other ranks (serve.py, stage.py, group.py), talking to its
supervisor with the messages in messages.py.
"""
