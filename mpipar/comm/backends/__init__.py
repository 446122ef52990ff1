"""Where bytes move for a collective not in shared memory: the MPI library (mpi) or a ring on p2p (ring)."""
