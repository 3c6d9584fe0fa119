"""One technique per module: functions from (model, pairs, options) to an xarray Dataset."""
