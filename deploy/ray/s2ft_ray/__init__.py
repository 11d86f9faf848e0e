"""s2ft-serve on Ray Serve: N engine replicas behind one endpoint, routed by adapter.

`ingress` parses each HTTP request just enough to find its adapter and forwards it, through
Ray Serve model multiplexing, to a `replica` that runs the unchanged s2ft-serve app in process.
`catalog` holds the fleet's admin state and pushes admin changes to every replica.
"""
