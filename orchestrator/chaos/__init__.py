"""`python -m orchestrator chaos`: the live system under load while seeded faults hit it.

faults.py injects each fault kind into a running deployment and confirms it really happened;
run.py drives the load, schedules the faults, lets the system settle and checks every stream
against the uninterrupted reference; orchestrator/cli/chaos.py prints the report.
"""
