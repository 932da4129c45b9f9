# The topic contract (README "Topics"): every topic the device uses, built once per device.


class Topics:
    def __init__(self, prefix, device_id):
        base = "%sdevices/%s/" % (prefix, device_id)
        self.base = base
        self.telemetry = base + "telemetry"
        self.status = base + "status"
        self.cmd_filter = base + "cmd/+"

    def cmd_result(self, name):
        return "%scmd/%s/result" % (self.base, name)
