# The shape of an application: a package `app` whose setup(dev) declares what it adds to
# the firmware (firmware/api.py). This one needs no hardware: a setting, a reading sent
# with each telemetry message and a command. examples/ has real ones: env_sensor (an I2C
# sensor, events, state) and relay (a GPIO, a command, a supervised task).


def setup(dev):
    dev.setting("greeting", "str", "hello")  # app.greeting in the config twin
    said = [0]  # hellos answered this boot (a list: the closures below change it)

    dev.sensor("hellos", lambda: said[0])

    async def hello(args):  # devices/{id}/cmd/hello {"name": "you"}
        said[0] += 1
        return {"text": "%s, %s" % (dev.get("greeting"), args.get("name", "world"))}

    dev.command("hello", hello)
