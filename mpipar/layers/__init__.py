"""mpipar.layers: plain-torch pieces shared by the serial models (mpipar.models) and the parallel
layers (mpipar.tensor, mpipar.sequence): attention head reshapes (`heads`), rotary
positions (`rotary`) and the seeded, layout-independent initialisation (`init`). No MPI, no
imports from the rest of mpipar.
"""
