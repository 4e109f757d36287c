"""Training: typed run settings, devices, distributed helpers and the epoch loop that
measures spectra after every epoch."""
