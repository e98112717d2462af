"""Structure sources, zone-axis orientation, abTEM multislice and the simulation factory."""
