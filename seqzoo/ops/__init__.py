"""The maths of every mixer as plain functions (no nn.Module): recurrent, chunked and kernel forms."""
