"""`medpruner serve`: the HTTP job server the Slicer module (or any client) sends volumes to."""
