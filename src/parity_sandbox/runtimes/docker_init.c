/*
 * parity-init: process 1 of every parity-sandbox container.
 *
 *   /.parity/init [-o OUTPUT]... -- COMMAND [ARGS...]
 *
 * 1. Reads a 32-byte secret from stdin before anything else. The host writes it once the
 *    container runs and its input files are in place, so it doubles as the "go" signal. The
 *    rest of stdin is the task's.
 * 2. Runs COMMAND as its child and reaps every zombie of the container while it runs.
 * 3. When COMMAND exits, kills every other process of the container (orphans included: kill(-1)
 *    from process 1 reaches the whole PID namespace), then writes the secret and COMMAND's
 *    status (one byte: the exit code, or 128 + the signal) to stdout. The attach stream does not
 *    end when a process closes its output, so this trailer is how the host learns that the task
 *    and all it started are gone; no task process can forge it, as none knows the secret. A
 *    last byte says whether any OUTPUT (a path under /work) exists.
 * 4. Closes its streams. If there are outputs, waits for SIGUSR1, keeping the container (and so
 *    its tmpfs workspace) alive while the host copies them out; then, or at once when there
 *    are none, exits with COMMAND's status: a container that exits by itself is removed much
 *    faster than one that has to be killed.
 *
 * Process 1 of a PID namespace gets no signal it has no handler for, so the task cannot kill it;
 * it is also made non-dumpable so that a task running as the same user cannot read its memory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define SECRET_BYTES 32
#define MAX_OUTPUTS 64

static void ignore(int sig) { (void)sig; }

static int status_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
    return 255;
}

static int write_all(int fd, const unsigned char *data, size_t size) {
    while (size > 0) {
        ssize_t done = write(fd, data, size);
        if (done < 0 && errno == EINTR) continue;
        if (done <= 0) return -1;
        data += done;
        size -= (size_t)done;
    }
    return 0;
}

static int any_exists(char **outputs, int count) {
    char path[4200];
    struct stat info;
    for (int i = 0; i < count; i++) {
        if (snprintf(path, sizeof path, "/work/%s", outputs[i]) >= (int)sizeof path) continue;
        if (lstat(path, &info) == 0) return 1;
    }
    return 0;
}

int main(int argc, char **argv) {
    int arg = 1, output_count = 0;
    char *outputs[MAX_OUTPUTS];
    while (arg + 1 < argc && strcmp(argv[arg], "-o") == 0 && output_count < MAX_OUTPUTS) {
        outputs[output_count++] = argv[arg + 1];
        arg += 2;
    }
    if (arg < argc && strcmp(argv[arg], "--") == 0) arg++;
    if (arg >= argc) {
        fputs("parity-init: no command to run\n", stderr);
        return 127;
    }
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    unsigned char trailer[SECRET_BYTES + 2];
    size_t have = 0;
    while (have < SECRET_BYTES) {
        ssize_t got = read(0, trailer + have, SECRET_BYTES - have);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            fputs("parity-init: stdin ended before the host's secret\n", stderr);
            return 127;
        }
        have += (size_t)got;
    }

    sigset_t handled, previous;
    sigemptyset(&handled);
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = ignore;
    const int signals[] = {SIGCHLD, SIGUSR1};
    for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++) {
        sigaction(signals[i], &action, NULL);
        sigaddset(&handled, signals[i]);
    }
    sigprocmask(SIG_BLOCK, &handled, &previous);

    int code = 126;
    pid_t child = fork();
    if (child == 0) {
        memset(trailer, 0, sizeof trailer);
        setpgid(0, 0); /* the task's own group: kill(0, ...) in the task cannot reach us */
        action.sa_handler = SIG_DFL;
        for (size_t i = 0; i < sizeof signals / sizeof signals[0]; i++)
            sigaction(signals[i], &action, NULL);
        sigprocmask(SIG_SETMASK, &previous, NULL);
        execvp(argv[arg], argv + arg);
        int error = errno;
        dprintf(2, "parity-init: cannot run %s: %s\n", argv[arg], strerror(error));
        _exit(error == ENOENT ? 127 : 126);
    }
    if (child < 0) {
        dprintf(2, "parity-init: cannot start the task: %s\n", strerror(errno));
    } else {
        for (int done = 0; !done;) {
            if (sigwaitinfo(&handled, NULL) != SIGCHLD) continue;
            int status;
            pid_t pid;
            while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
                if (pid == child) {
                    code = status_code(status);
                    done = 1;
                }
            }
        }
    }
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) {}
    int keep = any_exists(outputs, output_count);
    trailer[SECRET_BYTES] = (unsigned char)code;
    trailer[SECRET_BYTES + 1] = (unsigned char)keep;
    write_all(1, trailer, sizeof trailer);
    write_all(2, trailer, sizeof trailer);
    close(0);
    close(1);
    close(2);
    while (keep && sigwaitinfo(&handled, NULL) != SIGUSR1) {}
    return code;
}
