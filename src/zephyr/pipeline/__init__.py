"""`zephyr run`: the plan of a pipeline recipe's stages (`run`) and the run folder's manifest (`manifest`)."""
