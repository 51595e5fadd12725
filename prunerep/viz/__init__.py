"""The edge where results become what a person sees: figures, printed tables and the files they go to."""
