"""Pure contracts and policies shared by serving and the simulator: request types, the router, the config tree,
traces, experiments and latency summaries. Nothing here reads a clock, sleeps, calls Ray or opens a socket."""
