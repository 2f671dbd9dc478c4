"""`adrenaline serve`: the launcher of a whole deployment on one machine, its flag checks, and the same as a child process."""
