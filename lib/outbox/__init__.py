# Durable outbox for telemetry: a preallocated RAM ring (ring.py) spilling to a
# power-loss-safe log of segment files on flash (flashlog.py), records self-checking
# (record.py). Work in progress: the tiers are built and tested; composing them into the
# outbox the MQTT session drains is the next step of issue 4.
