"""Device kinds (camera, microphone, operation log, panel, clock): one interface each, with a
real and a simulated implementation picked by the board profile. Hardware libraries are
imported only inside their backend module."""
