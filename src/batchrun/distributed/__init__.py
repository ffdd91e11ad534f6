"""Scale-out: one plan over many workers (GPUs or CPU processes, on one machine or many), on Ray.

`units` cuts the plan and models the schedule, `subplan` slices a unit's plan, `worker` runs units, `dispatch`
pulls them through the workers and `driver` (the only importer of ray) sets it all up: `run_distributed`.
"""
