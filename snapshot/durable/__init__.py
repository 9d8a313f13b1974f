"""What outlives the process: the journal of every session and snapshot (`journal`), the
stores it writes to (`store`: memory or Redis), and the membership of engines sharing a
store (`cluster`: heartbeats, the worker registry, rehoming a dead worker's sessions)."""
