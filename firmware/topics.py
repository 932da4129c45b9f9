# The topic contract (README "Topics"): every topic the device uses, built once per device.


class Topics:
    def __init__(self, prefix, device_id):
        base = "%sdevices/%s/" % (prefix, device_id)
        self.base = base
        self.telemetry = base + "telemetry"
        self.status = base + "status"
        self.health = base + "health"
        self.cmd_prefix = base + "cmd/"
        self.cmd_filter = base + "cmd/+"
        self.desired = base + "config/desired"
        self.reported = base + "config/reported"
        self.ota = base + "ota"
        self.prefix = prefix

    def group_desired(self, group):
        return "%sfleet/%s/config/desired" % (self.prefix, group)

    def cmd_result(self, name):
        return "%scmd/%s/result" % (self.base, name)
