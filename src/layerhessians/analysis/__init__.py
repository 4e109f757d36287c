"""Analysis of stored runs: distances between spectra, matching layers to the full
Hessian, and figures."""
