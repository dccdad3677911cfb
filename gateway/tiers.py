"""Service tiers: the one place their names, and what each is served as, are written.

"on_demand" is served first; "flex" waits in a lane of its own (gateway/queue.py, worker/jobs.py)
that is refused fast when full, and its jobs carry a lower engine priority. Imported by request
validation and by the API key CLI (which must not load the model catalog).
"""

ON_DEMAND, FLEX = "on_demand", "flex"
# The tiers that serve requests, which responses report and an API key may default to.
TIERS = (ON_DEMAND, FLEX)
# Tiers a request may ask for, and the one that serves it: "auto" and "default" (the openai
# SDK's name) are served on demand.
SERVICE_TIERS = {"auto": ON_DEMAND, "default": ON_DEMAND, ON_DEMAND: ON_DEMAND, FLEX: FLEX}
# Names that ask for the default tier: on_demand, or with auth the API key's (gateway/apikeys.py).
DEFAULT_TIERS = ("auto", "default")
# The engine's request priority of each tier (vLLM: lower is scheduled first).
TIER_PRIORITY = {ON_DEMAND: 0, FLEX: 1}
